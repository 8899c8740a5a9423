"""Logging: JSON lines in ``DATA_DIR/logs/<component>.log`` and a readable line on stderr.

Extra fields passed with ``extra={...}`` (calling_ae, study_uid, request_id …)
become keys of the JSON object, so a study can be followed across processes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class ConsoleFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")
        )
        line = f"{time.strftime('%H:%M:%S')} {self.component:<7} {record.levelname.lower():<7} "
        line += record.getMessage() + (f"  [{extras}]" if extras else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(component: str, logs_dir: Path | None, level: str = "info") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter(component))
    root.addHandler(console)
    if logs_dir is not None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logs_dir / f"{component}.log", encoding="utf-8")
        fh.setFormatter(JsonFormatter(component))
        root.addHandler(fh)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("huey").setLevel(logging.WARNING)  # one line per sweep otherwise
