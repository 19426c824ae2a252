"""flctl simulate's end lines: the champion's registry URI, read from the tracker's stats file."""

import json

from fl_lightning_mlflow.common.protocol import STATS_FILE
from flctl.outcome import Outcome, read_stats
from flctl.simulate import report_champion

URIS = {"champion": "models:/m@champion", "final": "models:/m@final"}


def test_the_champion_uri_is_printed_beside_the_tracking_uri(tmp_path, capsys):
    stats = {"status": "FINISHED", "registered_model": {"name": "m", "aliases": {"champion": "3"}, "uris": URIS}}
    (tmp_path / STATS_FILE).write_text(json.dumps(stats))
    outcome = Outcome(tmp_path, stats=read_stats(tmp_path))
    assert outcome.champion_uri == "models:/m@champion"
    report_champion(outcome, "sqlite:////x/mlflow.db")
    out = capsys.readouterr().out
    assert out.startswith("best model:      models:/m@champion  ") and "tracking URI sqlite:////x/mlflow.db" in out


def test_nothing_is_printed_when_nothing_was_registered(tmp_path, capsys):
    for stats in (None, {"status": "FAILED"}, {"registered_model": "odd"}, {"registered_model": {"uris": ["x"]}}):
        outcome = Outcome(tmp_path, stats=stats)
        assert outcome.champion_uri is None
        report_champion(outcome, "sqlite:////x/mlflow.db")
    assert capsys.readouterr().out == ""
