"""The backlog page: bgqueue's pending requests in the browser, inside Flower.

Pending requests are Redis records, not Celery messages, so Flower shows nothing of what
waits for its date, for a capable worker or for a handler. `bgqueue flower` serves this
page under Flower's own login, at `/bgqueue/pending` (linked from Flower's navbar):

- `listing`: what one page reads from Redis (a bounded number of keys, whatever the backlog);
- `render`: the page as plain HTML, every value escaped;
- `web`: the Tornado handlers added to Flower's application, and the cancel action.
"""
