from django.apps import AppConfig, apps


class RealtimeConfig(AppConfig):
    """Connects the admin and auth signals, hooks the live admin and registers the system checks."""

    name = "realtime"
    verbose_name = "Realtime"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from realtime import checks, signals  # noqa: F401  (registration side effects)

        signals.connect()
        if apps.is_installed("django.contrib.admin"):
            from realtime import live_admin

            live_admin.install()
