from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    """Connects the admin and auth signals and registers the system checks."""

    name = "realtime"
    verbose_name = "Realtime"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from realtime import checks, signals  # noqa: F401  (registration side effects)

        signals.connect()
