"""An app for tests.object_rules_settings: gives the admin's GroupAdmin tests.object_rules' rules for good."""

from django.apps import AppConfig


class ObjectRulesConfig(AppConfig):
    name = "tests"
    label = "realtime_object_rules"

    def ready(self) -> None:
        from django.contrib import admin
        from django.contrib.auth.models import Group

        from tests.object_rules import OwnGroupsOnly

        admin.site._registry[Group].__class__ = OwnGroupsOnly
