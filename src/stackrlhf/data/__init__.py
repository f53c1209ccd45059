"""Stack Exchange dump -> datasets: reading, cleaning, scoring, pairing, splitting, fetching."""
