"""A small alignment-tax study that runs on a CPU: preference reward versus capability for AdamW,
regularisation baselines, offline merging and the online merging optimizers.

Run it with ``python -m onmerge_megatron.study.run --mode quick|full``; docs/study.md explains it.
"""
