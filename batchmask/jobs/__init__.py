"""Scheduled jobs: definitions that cron (or systemd, Kubernetes, Ray Jobs) runs repeatedly.

Modules: :mod:`.spec` (the job file: parse and validate), :mod:`.schedule` (cron expressions,
slots), :mod:`.execute` (``jobs run``: one bounded, locked, logged run in a child process),
:mod:`.render` (crontab, systemd, Kubernetes manifests), :mod:`.submit` (Ray Jobs).
"""
