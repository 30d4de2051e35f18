"""python -m fvis"""

from fvis.cli import main

main()
