"""Small deterministic models, one per case fvis exists for, and how to build their checkpoints.

>>> from sample_models import SAMPLES, build, example_input
>>> build("inner_outer")(example_input("inner_outer")).shape
torch.Size([1, 2])
"""

from __future__ import annotations

from sample_models.zoo import SAMPLES, SampleSpec, build, example_input

__all__ = ["SAMPLES", "SampleSpec", "build", "example_input"]
