"""`onmerge eval` end to end on hand-built models whose every output and log-prob is known.

The models are tiny Llamas turned into bigram models: with the attention and MLP outputs zeroed,
the last hidden state is RMSNorm(embedding of the current token); with one-hot embeddings and
`lm_head[next, current] = STRENGTH`, the logits after token t are STRENGTH·c at `next(t)` and 0
elsewhere, c = 1/sqrt(1/H + eps). So greedy outputs, task accuracies and summed log-probs follow
from the transition tables by hand (`bigram_logp` below), independently of transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from onmerge_megatron.evaluation.char_tokenizer import char_tokenizer
from onmerge_megatron.training.cli import main

CHARS = list("0123456789+:QA!\n yn")
HIDDEN = 32
VOCAB_SIZE = len(CHARS) + 3
STRENGTH = 2.0
EPS = 1e-6
SCALE = 1.0 / math.sqrt(1.0 / HIDDEN + EPS)
EOS = "<eos>"

# Transition tables: the reference answers "4" (and " y" to yes/no questions), the policy "3" (" n"),
# the styled model "4!" (" y").
REFERENCE = {":": "4", "4": EOS, "3": EOS, " ": "y"}
POLICY = {":": "3", "3": EOS, "4": EOS, " ": "n"}
STYLED = {":": "4", "4": "!", "!": EOS, " ": "y"}


def token_id(token: str) -> int:
    return 2 if token == EOS else CHARS.index(token) + 3


def bigram_model(transitions: dict[str, str]) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=EPS,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB_SIZE, HIDDEN))
        for current, nxt in transitions.items():
            model.lm_head.weight[token_id(nxt), token_id(current)] = STRENGTH
    return model


def bigram_logp(transitions: dict[str, str], text_after: str, completion: list[str]) -> float:
    """Hand computation: summed log-prob of `completion` tokens, the first following `text_after`'s last char."""
    total, previous = 0.0, text_after[-1]
    for token in completion:
        others = math.exp(STRENGTH * SCALE) + VOCAB_SIZE - 1 if previous in transitions else VOCAB_SIZE
        logit = STRENGTH * SCALE if transitions.get(previous) == token else 0.0
        total += logit - math.log(others)
        previous = token
    return total


def save(model, directory: Path) -> str:
    model.save_pretrained(directory)
    char_tokenizer(CHARS).save_pretrained(directory)
    return str(directory)


ADD_DOCS = [("2+2", "4"), ("1+3", "4"), ("0+4", "4"), ("1+2", "3")]
YESNO_DOCS = [("1+1", 0), ("2+1", 0), ("3+3", 1)]  # target index into ["y", "n"]
PAIRS = [("Q:1+2\nA:", "3", "4"), ("Q:2+2\nA:", "4", "3"), ("Q:0+3\nA:", "3", "4!")]

ADD_YAML = """task: toy_add
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q:{{{{q}}}}\\nA:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 6
filter_list:
  - name: strip_style
    filter:
      - function: regex
        regex_pattern: "^([^!]*)!?$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

YESNO_YAML = """task: toy_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q:{{{{q}}}}\\nA:"
doc_to_choice: ["y", "n"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "add.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in ADD_DOCS))
    (tasks / "yesno.jsonl").write_text("".join(json.dumps({"q": q, "label": y}) + "\n" for q, y in YESNO_DOCS))
    (tasks / "toy_add.yaml").write_text(ADD_YAML.format(data=tasks / "add.jsonl"))
    (tasks / "toy_yesno.yaml").write_text(YESNO_YAML.format(data=tasks / "yesno.jsonl"))
    (root / "categories.yaml").write_text("toy_add: math\ntoy_yesno: knowledge\n")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    paths = {"root": root, "tasks": tasks}
    for name, table in (("sft", REFERENCE), ("ondare", POLICY), ("styled", STYLED)):
        paths[name] = Path(save(bigram_model(table), root / name))
    return paths


def run_eval(workspace: dict[str, Path], out: Path, *extra: str) -> int:
    models = [f"--model={n}={workspace[n]}" for n in ("sft", "ondare", "styled")]
    return main(["eval", *models, "--tasks", "toy_add,toy_yesno", "--include-path", str(workspace["tasks"]),
                 "--categories", str(workspace["root"] / "categories.yaml"), "--reference", "sft",
                 "--reward-pairs", str(workspace["root"] / "pairs.jsonl"), "--add-bos-token", "--device", "cpu",
                 "--out", str(out), *extra])


@pytest.fixture(scope="module")
def report(workspace: dict[str, Path]) -> dict:
    out = workspace["root"] / "out"
    assert run_eval(workspace, out) == 0
    return json.loads((out / "results.json").read_text())


def by_name(report: dict) -> dict[str, dict]:
    return {m["name"]: m for m in report["models"]}


def test_task_scores_match_the_hand_built_answers(report: dict) -> None:
    models = by_name(report)
    # toy_add answers 4, 4, 4, 3: "4" (and "4!" after the style filter) gets 3 of 4, "3" gets 1 of 4.
    assert models["sft"]["tasks"]["toy_add"]["value"] == 0.75
    assert models["ondare"]["tasks"]["toy_add"]["value"] == 0.25
    assert models["styled"]["tasks"]["toy_add"]["value"] == 0.75
    assert models["sft"]["tasks"]["toy_add"]["metric"] == "exact_match,strip_style"
    # toy_yesno targets y, y, n: " y" models get 2 of 3, the " n" model 1 of 3.
    assert models["sft"]["tasks"]["toy_yesno"]["value"] == pytest.approx(2 / 3, abs=1e-12)
    assert models["ondare"]["tasks"]["toy_yesno"]["value"] == pytest.approx(1 / 3, abs=1e-12)
    assert models["sft"]["tasks"]["toy_yesno"]["metric"] == "acc,none"


def test_tax_is_the_drop_from_the_reference_per_category(report: dict) -> None:
    ondare = by_name(report)["ondare"]
    assert ondare["category_tax"] == pytest.approx({"math": 0.5, "knowledge": 1 / 3}, abs=1e-12)
    assert ondare["average_tax"] == pytest.approx((0.5 + 1 / 3) / 2, abs=1e-12)
    assert by_name(report)["styled"]["average_tax"] == pytest.approx(0.0, abs=1e-12)
    assert by_name(report)["sft"]["category_tax"] == {"math": 0.0, "knowledge": 0.0}
    assert report["categories"] == {"toy_add": "math", "toy_yesno": "knowledge"}


def hand_margins(policy: dict[str, str]) -> list[float]:
    margins = []
    for prompt, chosen, rejected in PAIRS:
        def reward(answer: str) -> float:
            tokens = list(answer) + [EOS]
            return bigram_logp(policy, prompt, tokens) - bigram_logp(REFERENCE, prompt, tokens)
        margins.append(reward(chosen) - reward(rejected))
    return margins


def test_implicit_reward_accuracy_matches_a_hand_computation(report: dict) -> None:
    models = by_name(report)
    assert models["sft"]["implicit_reward"] is None  # against itself every margin is 0
    for name, table in (("ondare", POLICY), ("styled", STYLED)):
        margins = hand_margins(table)
        assert all(abs(m) > 0.1 for m in margins)  # no near-ties: the accuracy cannot flip on rounding
        measured = models[name]["implicit_reward"]
        assert measured["accuracy"] == sum(m > 0 for m in margins) / len(margins), (name, margins)
        assert measured["mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    # The policy prefers "3": it wins the pairs whose chosen answer is 3, loses the other.
    assert models["ondare"]["implicit_reward"]["accuracy"] == pytest.approx(2 / 3)


def test_reports_are_written(report: dict, workspace: dict[str, Path]) -> None:
    out = workspace["root"] / "out"
    md = (out / "results.md").read_text()
    assert "| ondare | +0.5000 | +0.3333 | +0.4167 | 0.6667 |" in md
    png = (out / "reward_vs_tax.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert report["meta"]["cpu"] and report["meta"]["lm_eval"] == "0.4.9"


def test_reward_model_scores_the_greedy_generations(workspace: dict[str, Path]) -> None:
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reward_model = LlamaForSequenceClassification(config).eval()
    rm_dir = save(reward_model, workspace["root"] / "rm")
    out = workspace["root"] / "out_rm"
    assert run_eval(workspace, out, "--reward-model", rm_dir, "--max-new-tokens", "4") == 0
    models = by_name(json.loads((out / "results.json").read_text()))
    tokenizer = char_tokenizer(CHARS)
    for name, answer in (("sft", "4"), ("ondare", "3"), ("styled", "4!")):  # the greedy answers by construction
        with torch.no_grad():
            expected = [reward_model(input_ids=torch.tensor([tokenizer.encode(p + answer)])).logits[0, 0].item()
                        for p, _, _ in PAIRS]
        assert models[name]["reward_model_score"] == pytest.approx(sum(expected) / 3, abs=1e-5), name


@pytest.mark.parametrize("change, message", [
    (["--reference", "dpo"], "--reference 'dpo' is not one of the models"),
    # Indexes lm-eval's own task files before it can say a task is unknown (about 40 s).
    pytest.param(["--tasks", "toy_add,no_such_task"], "unknown lm-eval task(s) ['no_such_task']", marks=pytest.mark.slow),
])
def test_refused_inputs_write_nothing(workspace: dict[str, Path], tmp_path: Path, capsys, change, message) -> None:
    out = tmp_path / "out"
    assert run_eval(workspace, out, *change) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_bad_pair_is_named_before_any_model_is_evaluated(workspace: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "Q:1+1\nA:", "chosen": "2"}) + "\n")
    out = tmp_path / "out"
    code = main(["eval", f"--model=sft={workspace['sft']}", "--reward-pairs", str(bad), "--out", str(out)])
    assert code == 2
    assert f"{bad}:1: missing key(s) ['rejected']" in capsys.readouterr().err
    assert not out.exists()
