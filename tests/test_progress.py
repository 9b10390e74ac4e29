"""Progress output fits where it goes: a live bar on a terminal, plain lines in a log or CI."""
import io

from conftest import tiny_student


def test_lines_in_a_log_are_whole_lines_at_most_every_tenth(monkeypatch):
    from distill.progress import Lines

    out = io.StringIO()
    bar = Lines(200, "cache images", "view", every_s=1e9, stream=out)
    for _ in range(200):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 10 <= len(lines) <= 11  # each tenth, and the end
    assert lines[0].startswith("cache images: 20/200 views (10%), ") and lines[-1].startswith("cache images: 200/200")
    assert all("loss=0.5" in line for line in lines[1:])


def test_the_mode_follows_the_stream_and_the_environment(monkeypatch):
    from distill import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    assert progress.mode(io.StringIO()) == "lines" and progress.mode(Tty()) == "bar"
    monkeypatch.setenv("DISTILL_PROGRESS", "off")
    assert progress.mode(Tty()) == "off"
    assert progress.progress(10, "x").disable


def test_a_fit_logged_to_a_file_prints_plain_lines(teacher, shapes, tmp_path, capsys, monkeypatch):
    from distill import Distiller

    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)  # stderr is captured: not a terminal
    Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "r"), max_steps=10, batch_size=8, num_workers=0,
              warmup_steps=1, health_every=0).fit(str(shapes / "train.csv"))
    err = capsys.readouterr().err
    train = [line for line in err.splitlines() if line.startswith("train: ")]
    assert "\r" not in err and len(train) == 10 and train[-1].startswith("train: 10/10 steps (100%)")
