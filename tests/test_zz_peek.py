import pytest
from tests.conftest import make_user, logged_in
pytestmark = pytest.mark.django_db(transaction=True)
def test_peek(transactional_db):
    root = make_user("root", staff=True, superuser=True)
    a = make_user("alice")
    admin = logged_in(root)
    r = admin.post("/admin/auth/user/", {"action": "send_notification", "_selected_action": [a.pk], "index": 0})
    t = r.text
    print(t[t.index('<div id="content"'):t.index('<footer') if '<footer' in t else None][:3000])
    r = admin.post("/admin/auth/user/", {"action": "send_notification", "_selected_action": [a.pk], "apply": "yes", "message": ""})
    t = r.text
    i = t.index('<form method="post">')
    print(t[i:i+1500])
