"""server.job_start: what a tracked job's start does to the FL server's process."""


def test_the_job_start_freezes_what_lives_as_long_as_the_process_and_new_garbage_is_still_freed():
    import gc
    import weakref

    from fl_lightning_mlflow.server.job_start import freeze_long_lived_objects

    class Node:
        pass

    try:
        assert freeze_long_lived_objects() > 0 and gc.get_freeze_count() > 0
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
