"""Small deterministic models, one per case fvis exists for, and how to build their checkpoints.

The models live in ``sample_models.zoo``; ``python -m sample_models.build OUT_DIR`` writes them
in every format. (The package does not re-export ``zoo.build``: importing the submodule
``sample_models.build`` would replace that name.)

>>> from sample_models.zoo import build, example_input
>>> build("inner_outer")(example_input("inner_outer")).shape
torch.Size([1, 2])
"""

from __future__ import annotations

from sample_models.zoo import SAMPLES, SampleSpec, example_input

__all__ = ["SAMPLES", "SampleSpec", "example_input"]
