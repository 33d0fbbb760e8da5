"""The operations dashboard at ``/dashboard``: queue, providers, warm-up, lag and searches, live in a browser.

``routes`` serves the pages (server-rendered Jinja2 with a small script for live refresh),
``data`` reads what they show through the modules that own it, ``session`` logs people in with
an API key (sealed cookie, CSRF token, same-origin check), ``config`` is ``[dashboard]``.
Templates and assets (``templates/``, ``static/``, with Swagger UI for ``/docs``) ship in the
package: nothing is fetched from another site.
"""
