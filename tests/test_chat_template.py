"""model.chat_template: a template (file or string) for a model whose tokenizer has none (issue 33)."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from alignlab.models import ModelSpec, load_tokenizer
from tests.conftest import TINY_RUN, alignlab

# A plain "Question/Answer" template, nothing like the tiny model's ChatML one
QA = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}"
      "Question: {{ m['content'] }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}")


def _without_template(tiny_dir, dst):
    """The tiny checkpoint with its chat template removed: a base model as far as prompting goes."""
    shutil.copytree(tiny_dir, dst)
    (dst / "chat_template.jinja").unlink()
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _by_hand(template: str, messages: list[dict[str, str]]) -> str:
    return jinja2.Template(template).render(messages=messages, add_generation_prompt=True)


def test_a_tokenizer_without_a_template_is_prompted_through_model_chat_template(tiny_dir, tmp_path):
    base = _without_template(tiny_dir, tmp_path / "base")
    tok = load_tokenizer(base)
    assert not tok.chat_template
    with pytest.raises(ValueError, match="chat template"):  # what a base model gave before
        ModelSpec(path=str(base)).render(tok, "1 + 2?")
    (tmp_path / "qa.jinja").write_text(QA)
    for value in (str(tmp_path / "qa.jinja"), QA):  # a file, or the template itself
        spec = ModelSpec(path=str(base), system_prompt="Be brief.", chat_template=value)
        assert spec.render(tok, "1 + 2?") == _by_hand(QA, [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "1 + 2?"}])
        assert spec.render(tok, "1 + 2?") == "Be brief.\n\nQuestion: 1 + 2?\nAnswer:"
    with pytest.raises(ValueError, match="chat_template: no such file"):
        ModelSpec(path=str(base), chat_template=str(tmp_path / "missing.jinja"))


@pytest.mark.slow
def test_a_round_on_a_model_without_a_template_uses_the_configured_one(tiny_dir, tmp_path):
    base = _without_template(tiny_dir, tmp_path / "base")
    template = (tiny_dir / "chat_template.jinja").read_text()  # the template the tiny model was trained with
    (tmp_path / "chatml.jinja").write_text(template)
    run = tmp_path / "run"
    alignlab(f"model.path={base}", f"model.chat_template={tmp_path / 'chatml.jinja'}", *TINY_RUN, "rounds=1",
             "base_eval=false", f"hydra.run.dir={run}")
    problems = {p["id"]: p for p in map(json.loads, (run / "round_1" / "prompts.jsonl").read_text().splitlines())}
    pairs = [json.loads(line) for line in (run / "round_1" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for p in pairs:
        assert p["prompt"] == _by_hand(template, [{"role": "user", "content": problems[p["problem_id"]]["prompt"]}])
    assert json.loads((run / "round_1" / "eval.json").read_text())["accuracy"] > 0  # it answered as it was trained
