"""Method specs of ``aimkp compare`` (``sft``, ``aimkp``, ``aimkp:FIELD=VALUE,...``)."""

from __future__ import annotations

import pytest

from aimkp.compare.methods import parse_method, parse_methods


def test_variant_options_are_typed() -> None:
    m = parse_method("aimkp:gf_reduce=sum,lr=1e-3,grand_threshold=none,full_finetune=false")
    assert m.method == "aimkp"
    assert m.options == {
        "gf_reduce": "sum",
        "lr": 1e-3,
        "grand_threshold": None,
        "full_finetune": False,
    }
    assert isinstance(parse_method("sft:batch_size=4").options["batch_size"], int)
    assert parse_method("aimkp").options == {}
    assert parse_method("aimkp:gf_reduce=sum").slug == "aimkp_gf_reduce=sum"


def test_list_keeps_variant_options_together() -> None:
    ms = parse_methods("sft,aimkp:lr=1e-3,tau_text=0.3,aimkp")
    assert [m.label for m in ms] == ["sft", "aimkp:lr=1e-3,tau_text=0.3", "aimkp"]
    assert ms[1].options == {"lr": 1e-3, "tau_text": 0.3}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dpo", "unknown method 'dpo'"),
        ("aimkp:nope=1", "unknown TrainConfig field 'nope'"),
        ("aimkp:lr=fast", "option lr='fast': expected float"),
        ("aimkp:full_finetune=maybe", "expected bool"),
        ("aimkp:seed=3", "'seed' is set by the comparison"),
        ("aimkp:epochs=3", "'epochs' is set by the comparison"),
        ("aimkp:lr", "is not FIELD=VALUE"),
        ("aimkp:", "no options"),
        ("sft,sft", "method given twice: sft"),
        ("", "no methods given"),
    ],
)
def test_user_errors_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_methods(spec)
