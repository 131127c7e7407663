"""What travels between coordinator and hospitals: message contents (`wire`) and the closed set of
refusal codes a hospital may send (`reasons`)."""
