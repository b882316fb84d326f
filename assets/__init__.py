"""The app's static files: CSS, favicon and the example pictures offered for a first try.

Installed as ``app.assets`` (pyproject maps this folder there) and found through
``importlib.resources`` by ``app.ui`` and ``app.projects``; no Python lives here.
"""
