// The GPU test binary's main: gtest, plus the forward grid's error summary (forward_run.h) printed
// after the last test, which the device script's logs quote.
#include <gtest/gtest.h>

#include "forward_run.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ::testing::UnitTest::GetInstance()->listeners().Append(fa_test::fwd::new_summary_printer());
  return RUN_ALL_TESTS();
}
