"""Shared test settings: hypothesis profile without deadlines (the machine is shared/noisy)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "chronos", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60
)
settings.load_profile("chronos")
