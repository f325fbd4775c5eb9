"""What runs only in ``manage.py runwebsockets``: the asyncio worker and its parts."""
