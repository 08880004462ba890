"""``aimkp score``: JSON output, every source format, clear errors (run in-process)."""

from __future__ import annotations

import json

import pytest

from aimkp.cli import main


class _Out:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = rc, out, err


@pytest.fixture
def run_cli(capsys):
    def _run(*args: str) -> _Out:
        rc = main(["score", *args])
        cap = capsys.readouterr()
        return _Out(rc, cap.out, cap.err)

    return _run


def test_cli_score_json_on_jsonl_and_json(tmp_path, run_cli) -> None:
    recs = [
        {"id": "1", "text": "red apple", "keyphrases": ["apple", "fruit"]},
        {"id": "2", "text": "blue car", "keyphrases": ["car"]},
    ]
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    pred = tmp_path / "pred.txt"
    pred.write_text("apples, fruit\nboat;car\n")
    out = run_cli("--src", str(src), "--pred", str(pred), "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert {"F1@1", "F1@3", "F1@5", "MAP@5", "NDCG@5"} <= set(res)
    # post 1: P@1 = 1, R@1 = 1/2; post 2: P@1 = 0 -> P = 1/2, R = 1/4
    assert res["F1@1"] == pytest.approx(100 * 2 * 0.5 * 0.25 / 0.75)
    aj = tmp_path / "src.json"
    aj.write_text(
        json.dumps(
            [
                {
                    "id": r["id"],
                    "image": "x.jpg",
                    "text": r["text"],
                    "conversations": [
                        {"from": "human", "value": "<image>" + r["text"]},
                        {"from": "gpt", "value": ", ".join(r["keyphrases"])},
                    ],
                }
                for r in recs
            ]
        )
    )
    out2 = run_cli("--src", str(aj), "--pred", str(pred), "--json", "--protocol", "aimkp")
    assert out2.returncode == 0, out2.stderr
    res2 = json.loads(out2.stdout)
    assert res2["protocol"] == "aimkp"
    assert res2["F1@1"] == pytest.approx(100 * (2 * 1 * 0.5 / 1.5 + 0) / 2)


def test_cli_score_line_count_mismatch(tmp_path, run_cli) -> None:
    src = tmp_path / "s.txt"
    src.write_text("a b<sep>x<sep>http://h/i.jpg\nc d<sep>y<sep>http://h/j.jpg\n")
    pred = tmp_path / "p.txt"
    pred.write_text("x\n")
    out = run_cli("--src", str(src), "--pred", str(pred))
    assert out.returncode == 2
    assert "line count mismatch" in out.stderr and "1 prediction lines" in out.stderr


def test_cli_score_cmkp_release_table(shared_dir, run_cli) -> None:
    d = shared_dir / "data" / "cmkp"
    out = run_cli("--src", str(d / "test_src.txt"), "--pred", str(d / "m3h_att_test_pred.txt"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "protocol: cmkp"
    assert lines[2].split()[:4] == ["all", "5372", "47.13", "33.22"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["all", "present", "absent"]


def test_cli_score_missing_file(tmp_path, run_cli) -> None:
    out = run_cli("--src", str(tmp_path / "nope.jsonl"), "--pred", str(tmp_path / "p.txt"))
    assert out.returncode == 2 and "no such data file" in out.stderr
