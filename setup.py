"""Only the optional C extension lives here; everything else is in pyproject.toml.

``fvis._moments`` computes an activation's statistics in one read (see fvis/_moments.c) and
holds the hook session's fast path (fvis/_trace.c, fvis/_wrap.c) and the module walk of each
capture (fvis/_walk.c).
It is optional: where no C compiler is found the build goes on without it, and fvis computes
the same statistics with torch ops, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fvis._moments",
            sources=[
                "fvis/_moments.c",
                "fvis/_trace.c",
                "fvis/_snapshot.c",
                "fvis/_trace_config.c",
                "fvis/_facts.c",
                "fvis/_trace_end.c",
                "fvis/_wrap.c",
                "fvis/_callsite.c",
                "fvis/_walk.c",
            ],
            depends=["fvis/_moments.h", "fvis/_trace.h"],
            optional=True,
            extra_compile_args=["-O2", "-fvisibility=hidden"],  # only PyInit is exported
        )
    ]
)
