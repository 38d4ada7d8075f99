"""Evaluation of aligned models: capability tasks with lm-evaluation-harness, tax against the SFT
model per task and category, and preference reward (implicit-reward accuracy on held-out pairs,
optionally a reward model). `onmerge eval` is its command line (`evaluation.cli`, `evaluation.runner`);
docs/eval.md describes it.

Nothing is imported here: `training/cli.py` registers the subcommand through `evaluation.cli`
without loading lm-eval, which only the `eval` extra installs.
"""
