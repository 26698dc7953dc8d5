"""``seedbed bench golf``'s table: every row, the missing compressors and the proof line."""

from seedbed.bench.golf import Report, Row, write_report


def test_report_lists_every_row_and_says_what_was_not_measured(tmp_path):
    report = Report(rows=[Row("gpt (no cache)", 1_020_208, 9_000.0, 2.05, 2.06, 40.0),
                          Row("gpt: model + cache, adapted", 12_000_000, 9_000.0, 1.74, 1.76, 600.0)],
                    proof="compress line", compressors=[Row("xz -9e", None, None, 2.41, 2.45, 9.0, "given the training text")],
                    missing=["zpaq"])
    output = tmp_path / "BENCHMARKS.md"
    write_report(report, 10.0, output)
    text = output.read_text()
    assert "| gpt (no cache) | 2.0500 | 2.0600 | 1,020,208 | 9,000 | 40 |  |" in text
    assert "| xz -9e | 2.4100 | 2.4500 | - | - | 9 | given the training text |" in text
    assert "Not installed, so not measured: zpaq" in text and text.rstrip().endswith("compress line")
    write_report(report, 10.0, output)  # a rerun replaces its section, never appends a second
    assert output.read_text().count("## seedbed bench golf") == 1
