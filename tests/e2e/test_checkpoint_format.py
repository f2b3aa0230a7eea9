"""The checkpoint format holds: a checkpoint folder written before the run state was given its parts and one
checkpointer (issue #20; `tests/fixtures/checkpoint_v1/step-00000006`, step 6 of the tiny recipe on one process)
resumes to exactly the tensors and losses that the code of that time reached from it, on 1 and on 2 processes.

`expected.json` holds what the old code wrote at step 12 (sha256 of every tensor but the RNG states, and the loss
history); `python tests/e2e/test_checkpoint_format.py OUT` writes it again from whatever code is importable."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.launching import REPO, TINY, launch

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.tier2]

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v1"
CHECKPOINT = FIXTURE / "step-00000006"
RUNS = {"one_process": ("cpu", []), "two_processes": ("cpu_ddp_2proc", ["--train.batch_size", "8"])}


def fingerprint(checkpoint: Path) -> dict[str, object]:
    """What must not change: every tensor of the checkpoint (RNG states aside) and the loss history."""
    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        if not file.name.startswith("rng-"):
            for key, tensor in load_file(str(file)).items():
                digest = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]
                tensors[f"{file.name}:{key}"] = digest
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {"loss_history": state["loss_history"], "tensors": tensors}


def resume(name: str, output: Path, cache: Path) -> Path:
    config, extra = RUNS[name]
    proc = launch(["--config", str(TINY), "--output", str(output), "--resume", str(CHECKPOINT), *extra], cache, config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output / "checkpoints" / "step-00000012"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_checkpoint_of_the_old_code_resumes_bit_identically(tmp_path: Path, face_cache: Path, name: str) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())[name]
    got = fingerprint(resume(name, tmp_path / "run", face_cache))
    assert got["loss_history"] == expected["loss_history"]
    assert got["tensors"] == expected["tensors"]


if __name__ == "__main__":  # regenerate expected.json (with the code that is importable: the old one, to pin it)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        results = {name: fingerprint(resume(name, Path(scratch) / name, Path(sys.argv[1]))) for name in RUNS}
    (FIXTURE / "expected.json").write_text(json.dumps(results, indent=1) + "\n")
