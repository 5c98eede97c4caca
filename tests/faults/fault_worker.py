"""A second application process for the history checker: `python fault_worker.py CONFIG OUT`.

CONFIG is a JSON file naming the docstore DSN and table, the Redis URL, the
store settings, the sessions and the deadline; the process runs
`fault_history.run_worker` in a few threads and writes every recorded call to
OUT as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_history import Recorder, op_to_dict, run_worker  # noqa: E402

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402
from session.config import redis_client_from_url  # noqa: E402


def main(config_path: str, out_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    docstore = PostgresDocumentStore(config["dsn"], table=config["table"], **config["docstore"])
    cache = redis_client_from_url(config["redis_url"])
    store = SessionStore(docstore, cache, **config["session"])
    recorder = Recorder()
    threads = [
        threading.Thread(
            target=run_worker,
            args=(
                store,
                f"{config['name']}-t{number}",
                config["sessions"],
                config["user_id"],
                config["stop_at"],
                recorder,
                config["seed"] + number,
            ),
        )
        for number in range(config["threads"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(out_path).write_text(json.dumps([op_to_dict(op) for op in recorder.ops]))
    store.close()
    cache.close()
    docstore.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
