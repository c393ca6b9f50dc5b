"""The bench's report: ratios, aims judged, one table, one JSON file."""

import json

from tests.bench.report import figure, ratio_figure, table, write_json


def test_a_ratio_figure_is_judged_against_its_aim():
    met = ratio_figure("credits.charge", 700, 1000, "calls/s", aim="ratio >= 0.6")
    missed = ratio_figure("credits.charge", 500, 1000, "calls/s", aim="ratio >= 0.6")
    context = ratio_figure("credits.charge_hot_row", 300, 1000, "calls/s")

    assert (met.ratio, met.met) == (0.7, True)
    assert (missed.ratio, missed.met) == (0.5, False)
    assert (context.aim, context.met) == (None, None)


def test_a_latency_figure_is_judged_on_its_value():
    assert figure("story.p50", 18.0, "ms", aim="value <= 20").met is True
    assert figure("story.p50", 21.0, "ms", aim="value <= 20").met is False


def test_one_table_and_one_json_file(tmp_path):
    figures = [ratio_figure("credits.charge", 700, 1000, "calls/s", aim="ratio >= 0.6", rounds=[0.7]),
               figure("story.p50", 18.0, "ms")]

    text = table(figures)
    path = write_json(figures, tmp_path, {"parts": ["credits"]})

    assert text.splitlines()[0].split() == ["figure", "value", "unit", "baseline", "ratio", "aim", "met"]
    assert "credits.charge" in text and "yes" in text
    document = json.loads(path.read_text())
    assert document["parts"] == ["credits"]
    assert [item["name"] for item in document["figures"]] == ["credits.charge", "story.p50"]
    assert document["figures"][0]["notes"] == {"rounds": [0.7]}
