"""Progress bars: where units cost unequally, the ETA follows the work left, not the count left."""

from __future__ import annotations

from calibrate.progress import Progress, eta


def test_eta_follows_the_work_left():
    # 10 s for 2 of 10 work units since the bar started: 8 left at that pace
    assert eta((100.0, 0.0), 110.0, 2.0, 10.0) == "about 0:40 left"
    # resumed at 4: only the work done since counts towards the pace
    assert eta((100.0, 4.0), 130.0, 5.0, 10.0) == "about 2:30 left"
    assert eta((100.0, 4.0), 130.0, 4.0, 10.0) == ""  # nothing timed yet


def test_a_bar_with_work_shows_the_work_eta_instead_of_the_count_eta(monkeypatch):
    import calibrate.progress as progress

    clock = iter([0.0, 0.0, 30.0])  # the bar made, its first update, its second
    monkeypatch.setattr(progress, "_clock", lambda: next(clock))
    bars = Progress()
    # the first unit is the dearest: 30 s for 30 of 40 work units leaves 10 s, although 2 of 3 units are left
    bars("curves", 0, 3, work=(0.0, 40.0))
    bars("curves", 1, 3, work=(30.0, 40.0))
    bar = bars.bars["curves"]
    assert bar.postfix == "about 0:10 left" and "{remaining}" not in bar.bar_format
    bars.close()
