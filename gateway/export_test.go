package gateway

// HandingOver reports whether a handover has begun and every connection
// has been told (both happen under s.mu): for tests that must act in
// the middle of one.
func (s *Server) HandingOver() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handing
}
