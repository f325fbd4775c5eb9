"""TOPIC_POLICY callables used by the tests."""


def members_only(user, topic: str) -> bool:
    """Allow "room:<name>" to users in the group of that name."""
    return topic.startswith("room:") and user.groups.filter(name=topic.removeprefix("room:")).exists()


def broken(user, topic: str) -> bool:
    raise RuntimeError("policy bug")


def slow(user, topic: str) -> bool:
    """Allow every topic, after a second: holds a login between its token check and its registration."""
    import time

    time.sleep(1.0)
    return True
