"""Clients of the tracker service: streaming client, replay and the dashboard."""
