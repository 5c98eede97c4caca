"""`import session` (and `import session.contrib`) imports no framework."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("django", "agents", "openai", "langchain_core", "pydantic")


def test_importing_session_imports_no_framework() -> None:
    code = (
        "import sys, session, session.contrib, docstore\n"
        f"loaded = [name for name in {FRAMEWORKS!r} if name in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_each_adapter_imports_only_its_framework() -> None:
    code = (
        "import sys, session.contrib.langchain\n"
        "print(','.join(n for n in ('django', 'agents') if n in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
