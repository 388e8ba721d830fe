"""Adapters for GarminSync's Garmin libraries. Each is its own module, imported only when you
import it, and needs its library installed:

- :mod:`centraldb_mfa.adapters.garth`: garth 0.8.0 and garth-ng 1.1.0 (both import as ``garth``)
- :mod:`centraldb_mfa.adapters.garminconnect`: python-garminconnect 0.3.x
"""
