import math

import pytest

from robustbench_alm.threat import Dataset, ThreatModel, check_eps, eps_text, parse_eps


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.031", 0.031), (0.1, 0.1),
                                         ("0", 0.0), (" 2 / 255 ", 2 / 255)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value, rel=0, abs=1e-15)


@pytest.mark.parametrize("bad", ["abc", "1/0", "-0.1", "nan", "inf", "8/"])
def test_parse_eps_refuses(bad):
    with pytest.raises(ValueError, match="eps"):
        parse_eps(bad)


@pytest.mark.parametrize("eps, text", [(8 / 255, "8/255"), (0.1, "25.5/255"), (0.0, "0/255"),
                                       (0.5, "127.5/255"), (0.031, "7.905/255")])
def test_eps_text(eps, text):
    assert eps_text(eps) == text


def test_check_eps_refuses_whole_box():
    with pytest.raises(ValueError, match="1.0"):
        check_eps(1.0, ThreatModel.LINF)
    check_eps(1.0, ThreatModel.L2)  # an L2 radius of 1 is a legitimate budget
    with pytest.raises(ValueError, match="finite"):
        check_eps(math.nan, ThreatModel.L2)


def test_enum_parsing_names_choices():
    assert ThreatModel.parse("linf") is ThreatModel.LINF
    assert Dataset.parse("Fashion-MNIST") is Dataset.FASHION_MNIST
    with pytest.raises(ValueError, match="Linf, L2"):
        ThreatModel.parse("L1")
    with pytest.raises(ValueError, match="cifar10"):
        Dataset.parse("imagenet")
