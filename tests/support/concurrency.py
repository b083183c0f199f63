"""What the save/load concurrency tests share: writers saving in a loop while a reader loads."""


def hammer(save_a, save_b, load, check, seconds: float = 1.5, max_loads: int = 400) -> tuple[int, list]:
    """Two writer threads saving in a loop and this thread loading meanwhile (bounded in time and count):
    (loads done, failures)."""
    import threading
    import time

    stop = threading.Event()
    writer_errors: list[BaseException] = []

    def writer(save):
        try:
            while not stop.is_set():
                save()
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            writer_errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f,), daemon=True) for f in (save_a, save_b)]
    for t in threads:
        t.start()
    loads, failures = 0, []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and loads < max_loads:
            try:
                check(load())
            except Exception as exc:  # noqa: BLE001 (counted)
                failures.append(repr(exc))
            loads += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not writer_errors, writer_errors
    return loads, failures
