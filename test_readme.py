"""
The README's promises, checked: every name in its reading order exists, its example task runs as
written, and its test command is the one CI runs.
"""
import ast
import os
import re

from conftest import HERE, read_metrics, run_train

README = open(os.path.join(HERE, "README.md")).read()


def test_reading_order_names_exist():
    """Each `file`: `name` of the reading-order table is a function or class defined in that file
    (a renamed function would leave the README pointing at nothing)."""
    table = README.split("## Reading order")[1].split("\n## ")[0]
    checked = 0
    for row in table.splitlines()[4:]:
        where = row.split("|")[2]
        for part in where.split(";"):
            m = re.match(r"\s*`([\w/.]+\.py)`:?(.*)", part)
            if not m:
                continue
            tree = ast.parse(open(os.path.join(HERE, m.group(1))).read())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            for outer, inner in re.findall(r"`(\w+)(?:\.(\w+))?`", m.group(2)):  # `GPT` or `GPT.generate`
                assert outer in defined and (not inner or inner in defined), (m.group(1), outer, inner)
                checked += 1
    assert checked >= 20


def test_the_readme_task_runs_as_written(tmp_path, monkeypatch):
    """The README's `mytask.py`, saved as is, trains with --task=mytask:make (tiny settings; the
    defaults' batch of 32 pairs fits its 90 training pairs) and PPO runs on its reward."""
    code = README.split("```python\n# mytask.py")[1].split("```")[0]
    (tmp_path / "mytask.py").write_text("# mytask.py" + code)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = run_train(tmp_path / "run", "--task=mytask:make", "--sft_iters=5", "--method=ppo", "--ppo_iters=1",
                    "--rollout_batch=8", "--ppo_minibatch=4", "--max_new_tokens=16", "--eval_samples=4", "--batch_size=32")
    assert {"policy_reward", "valid_fraction", "win_rate"} <= set(res)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["stage"] == "ppo"] == [1]


def test_the_test_command_is_what_ci_runs():
    """The README's test command appears, as is, in .ci/run."""
    command = re.search(r"`(python -m pytest[^`]*)`", README).group(1)
    assert command in open(os.path.join(HERE, ".ci", "run")).read()
