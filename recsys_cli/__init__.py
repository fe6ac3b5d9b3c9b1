"""The operator's tools, outside the code location: the ``recsys`` command line (``cli``), the local
stack's supervisor (``stack``), the demo (``demo``) and in-process materializations (``runner``)."""
