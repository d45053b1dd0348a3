"""Fakes at the Stripe boundary: localstripe as a subprocess, and a small fake for what localstripe lacks."""
