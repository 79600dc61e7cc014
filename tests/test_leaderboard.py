"""Leaderboard tables: sorted by robust accuracy, and no torch needed to build them."""

import subprocess
import sys

from robustbench_alm.entry import write_entry
from robustbench_alm.leaderboard import entries_frame, write_readme
from tests.test_entry import make_entry


def test_sorted_by_robust_accuracy(tmp_path):
    write_entry(tmp_path, make_entry(entry_id="weak", robust_acc=40.0, autoattack_acc=40.0))
    write_entry(tmp_path, make_entry(entry_id="strong", robust_acc=70.5, autoattack_acc=70.5))
    write_entry(tmp_path, make_entry(entry_id="other-tm", threat_model="L2", robust_acc=99.0,
                                     autoattack_acc=None))
    frame = entries_frame(tmp_path)
    linf = frame[frame.threat_model == "Linf"]
    assert list(linf.entry_id) == ["strong", "weak"]
    path, text = write_readme(tmp_path)
    assert path.read_text() == text
    assert text.index("## fashion-mnist, L2") < text.index("## fashion-mnist, Linf")
    assert text.index("strong") < text.index("weak")
    assert "70.50" in text and "0.0900" in text  # accuracy and median all-layer margin


def test_empty_leaderboard(tmp_path):
    _, text = write_readme(tmp_path / "none")
    assert "No entries yet" in text


def test_leaderboard_never_imports_torch(tmp_path):
    write_entry(tmp_path, make_entry())
    code = ("import sys; from robustbench_alm.leaderboard import write_readme; "
            f"write_readme({str(tmp_path)!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
