"""The scalability report: experiments read back, grouped, compared and drawn."""
