"""One module per op family: the public function, backend choice, fake and autograd."""
