"""The chart style applies to the report's figures only, never to matplotlib's global state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: in this one, other tests may have imported and configured matplotlib.
PROBE = textwrap.dedent(
    """
    import matplotlib

    def settings():  # without reading "backend": reading it resolves the backend (and imports pyplot)
        return {k: repr(matplotlib.rcParams._get(k)) for k in matplotlib.rcParams.keys() if k != "backend"}

    before, backend_before = settings(), matplotlib.rcParams._get_backend_or_none()
    import batchscope.analysis.report  # the report, its charts and their style
    from batchscope.analysis import style

    assert matplotlib.rcParams._get_backend_or_none() == backend_before, "importing chose a backend"
    assert settings() == before, "importing changed rcParams"

    with style.rc_context():
        fig, axes = style.figure(1)
        axes[0].plot([1, 2], [3, 4])
        assert axes[0].xaxis._major_tick_kw.get("gridOn"), "the report's look applies inside rc_context"
        png = style.to_bytes(fig, "png", title="t")
    assert png.startswith(bytes([0x89]) + b"PNG")
    assert settings() == before, "rendering left rcParams changed"
    assert "matplotlib.pyplot" not in __import__("sys").modules, "pyplot was imported"
    print("ok")
    """
)


def test_importing_and_rendering_leave_matplotlibs_settings_alone() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
