"""Generation jobs: players buy images with credits (create, run, follow, cancel, delete).

domain.py holds the rules and the request-side use cases, worker.py the run of one job,
storage.py the SQL, credits_client.py the credits service as the jobs see it, messaging.py
the queue (outbox relay and durable consumer); the portrait pipeline is in ../portraits/.
"""
