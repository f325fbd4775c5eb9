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


def slow_permission(user, topic: str) -> bool:
    """Allow holders of auth.view_user, deciding on the user as read a second before answering."""
    import time

    allowed = user.has_perm("auth.view_user")
    time.sleep(1.0)
    return allowed


def queries_slowly(user, topic: str) -> bool:
    """Allow every topic, after a query and a fifth of a second: a burst of logins occupies many threads."""
    import time

    user.groups.exists()
    time.sleep(0.2)
    return True
