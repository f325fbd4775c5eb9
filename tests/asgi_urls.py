"""Async views that publish, as an ASGI site would write them."""

from asgiref.sync import sync_to_async
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from project.urls import urlpatterns as project_urlpatterns
from realtime import apublish, apublish_many, publish


async def publish_view(request: HttpRequest) -> JsonResponse:
    """Publish one event and a batch to the requesting user, from async code (autocommit)."""
    user = await request.auser()
    if not user.is_authenticated:
        return JsonResponse({"error": "log in"}, status=401)
    event = await apublish("async.one", {"n": 0}, users=[user])
    count = await apublish_many({"event": "async.many", "data": {"n": n}, "users": [user.pk]} for n in (1, 2))
    return JsonResponse({"id": event.pk, "many": count})


def _change_and_publish(user_id: int, fail: bool) -> None:
    with transaction.atomic():
        publish("async.atomic", {"fail": fail}, users=[user_id])
        if fail:
            raise ValueError("rolled back")


async def atomic_view(request: HttpRequest) -> JsonResponse:
    """Publish atomically with a change: a sync function under atomic(), awaited with sync_to_async."""
    user = await request.auser()
    try:
        await sync_to_async(_change_and_publish)(user.pk, request.GET.get("fail") == "1")
    except ValueError:
        return JsonResponse({"committed": False}, status=409)
    return JsonResponse({"committed": True})


urlpatterns = [
    *project_urlpatterns,
    path("async/publish/", csrf_exempt(publish_view)),
    path("async/atomic/", csrf_exempt(atomic_view)),
]
