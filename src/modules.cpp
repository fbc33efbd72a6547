// placeholder until functional_call lands
#include <torchfunc/torchfunc.h>
