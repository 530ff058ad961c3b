"""The lazy public API: ``from batchmask import ...`` gives the functions, also once the
subpackages (``batchmask.batch``, ``batchmask.jobs``) are imported; ``import batchmask`` stays light."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import batchmask
assert "keras" not in sys.modules and "ray" not in sys.modules and "click" not in sys.modules, sorted(sys.modules)
{imports}
from batchmask import evaluate, load_model, predict, run, train
from batchmask.batch.runner import run as runner_run
from batchmask.evaluation import evaluate as ev
from batchmask.inference import load_model as lm
from batchmask.training import train as tr
assert run is runner_run and evaluate is ev and load_model is lm and train is tr, (run, evaluate, load_model, train)
assert callable(predict)
assert batchmask.run is runner_run
assert batchmask.__version__
print("ok")
"""


def _check(imports: str) -> None:
    res = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_api_functions_from_a_fresh_import():
    _check("")


def test_api_functions_after_the_subpackages_are_imported():
    _check("import batchmask.batch.runner\nimport batchmask.jobs.spec\nimport batchmask.batch\nimport batchmask.jobs")


def test_unknown_names_are_attribute_errors():
    import batchmask

    try:
        batchmask.no_such_function  # noqa: B018
    except AttributeError:
        return
    raise AssertionError("batchmask.no_such_function should not exist")
