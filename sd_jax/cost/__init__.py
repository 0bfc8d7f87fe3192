"""Energy and storage cost analysis."""
