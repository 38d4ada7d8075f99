"""A small alignment-tax study that runs on a CPU: reward-versus-tax frontiers of AdamW, a
regularisation baseline, offline merging and the online merging optimizers, scored through
`onmerge eval` on local lm-eval tasks.

Run it with ``python -m onmerge_megatron.study.run --mode quick|full``; docs/study.md explains it.
"""
