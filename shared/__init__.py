"""Small, one-way building blocks every casefile service uses; shared never imports services."""
