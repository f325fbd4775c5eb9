from django.urls import path

from realtime import views

app_name = "realtime"
urlpatterns = [
    path("", views.demo, name="demo"),
    path("token/", views.token, name="token"),
]
