"""Django-free rules shared by both processes: the wire protocol, audiences, rate limits. No I/O."""
